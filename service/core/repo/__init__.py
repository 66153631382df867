"""Database access, one module per aggregate. Every function takes the caller's tenant and
filters on it: a row of another tenant is never returned (routes turn that into a 404)."""
