"""The GraphQL management API: Strawberry types, inputs, queries and mutations.

Resolvers stay thin: check who is asking, call a service, map the result to a type or a typed
error value. The rules live in app/services.
"""
