"""The ``natbypass`` command and the twistd plugins' options and services."""
