"""The operator's console: what its pages show (`views`), who may see them
(`session`), and the templates and static files that ship in the package.
The routes are `host.api.console`."""
