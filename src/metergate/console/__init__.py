"""The built-in web console and the data behind the admin API.

`metergate.api.admin_api` is the HTTP face (JSON under `/admin/api/...`); the modules
here compute what it returns, straight from the runtime and the ledger, so the console
in the browser and any script or CLI read the same numbers. `static/` is the browser
front end: plain ES modules and CSS served by the gateway itself, no build step.
"""
