"""
Setuptools shim.  Metadata lives in setup.cfg (and the build backend in
pyproject.toml); this file only adds the twistd plugins, which live in the
non-package C{twisted/plugins} directory (no C{__init__.py}: it must not
shadow Twisted's own C{twisted.plugins}).

No C{dropin.cache} is ever shipped: Twisted writes that cache itself, next
to the installed plugin file, the first time anything (C{twistd --help})
looks for plugins, and rewrites it when a plugin file is newer.  A cache built
here would list only this project's plugins.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["natbypass", "natbypass.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/natbypass_plugins.py", "plugins/natbypass_endpoints.py"]},
    exclude_package_data={"": ["dropin.cache", "*.pyc"], "twisted.plugins": ["dropin.cache"]},
)
