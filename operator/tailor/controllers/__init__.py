"""kopf handlers, one module per kind. Thin: parse, build, apply, patch status."""
