//! Kafka harness (placeholder, filled in next).
