"""segment-topsort serve: Segment's webhooks and Tracking API over HTTP, delivered like run."""
