"""A semantic response cache in front of the engine: answers a request from a stored response when an
earlier request in the same namespace (tenant, model, sampling parameters, context) meant the same."""
