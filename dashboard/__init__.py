"""The web dashboard: server-rendered pages over the store, mounted into the API's app."""
