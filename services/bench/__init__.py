"""baton-bench: an open-loop load generator for an OpenAI-compatible endpoint.

Arrivals follow a seeded schedule (Poisson, gamma or constant gaps, in stages or from a
trace) and are sent when due, whatever earlier requests are doing. Each request's outcome
(good, objective missed, shed, error) is classified on the client; the summary is a table
per stage, a JSON file and an optional PNG.
"""
