"""The L7 layer of the core: runs the selected L7 parsers' proxies (see `component`)."""
