"""The lowest layer: where SQLAlchemy and the process are intercepted (the wrapped methods, the
one guard every hook and listener goes through, fork safety, the application's frames).
It imports nothing else of the package; the layers above subscribe to it."""
