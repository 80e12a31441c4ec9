"""What runs in a regional worker: fetch engines, extraction, limits, batching."""
