"""The region model, the Celery app, exchanges and queues, and the regional worker."""
