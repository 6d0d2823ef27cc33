"""Tools for plugin authors: `plughost.testing`, a pytest plugin that runs a
plugin directory through the real sandbox (the host itself is `host` and
`sandbox`)."""
