"""segment-topsort: declarative rules that turn Segment events into Topsort ad events."""
