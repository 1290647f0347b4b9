"""The High Availability web page: an HTTPS server in its own process.

password (admin password hashes), cert (the node's self-signed certificate),
auth (sessions, CSRF tokens, login throttling), api (the JSON API over the
daemon's control socket), openapi (its description), server (HTTP + TLS I/O),
supervisor (the daemon's handle on the web child). The static page lives in
static/: one HTML file, vanilla JS and CSS, no build step.
"""
