"""The web page (a package, so that its files ship with the wheel)."""
