"""What is drawn from the state: leaks, holders, idle transactions, pitfalls, and the database's
own view (read, joined with the holders, turned into sizing advice). Imports `state` and `hooks`."""
