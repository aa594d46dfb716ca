"""perfmodel tests, grouped like the package (specs/, sim/, search/, report/, calibrate/, compare/).
This folder is on sys.path (pytest puts a conftest's folder there), so every subfolder imports the
shared helpers of fakes.py."""
