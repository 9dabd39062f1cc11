"""Where events come from: files and archives, HTTP (serve), Kafka."""
