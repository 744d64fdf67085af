"""`infscaled tui`: a Textual dashboard over the controller's `/v1/watch` stream (no torch).

- `feed.py`: the subscription (websocket, reconnect with backoff), independent of Textual;
- `app.py`: the App: keys, views, the one worker that holds the subscription;
- `views.py`, `widgets.py`, `screens.py`: what is drawn; `format.py`: pure number formatting;
- `infscaled.tcss`: styles.

Everything is drawn from the latest snapshot only; the throughput sparkline is the one piece of
history the app keeps (`format.History`).
"""
