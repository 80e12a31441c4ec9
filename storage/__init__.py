"""The central store: SQLAlchemy models, migrations, ingest and queries."""
