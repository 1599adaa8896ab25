"""One module per tab: its components (`build`), its handlers (dict in, dict out) and its wiring (`wire`)."""
