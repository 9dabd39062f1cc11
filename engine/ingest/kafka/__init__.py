"""segment-topsort consume and produce: Segment events through a Kafka topic."""
