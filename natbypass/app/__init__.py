"""The C{natbypass} command and the twistd plugins' options and services."""
