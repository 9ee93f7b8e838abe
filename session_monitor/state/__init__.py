"""What the hooks update: sessions and their transactions, pools and their connections, the
per-request scope, the records and their frozen views, the plain counters, and the event
protocol (`observer.Observer`) that state and findings emit into. Imports only `hooks`."""
