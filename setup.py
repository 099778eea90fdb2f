"""
Setuptools shim.  Metadata lives in setup.cfg; this file only adds the
twistd plugins, which live in the (non-package) ``twisted/plugins``
directory, and refreshes Twisted's plugin cache after install so that
``twistd`` never sees a stale ``dropin.cache``.
"""

from setuptools import find_packages, setup
from setuptools.command.install import install


class InstallAndRefreshPlugins(install):
    """Regenerate twisted/plugins/dropin.cache once the files are in place."""

    def run(self) -> None:
        super().run()
        try:
            from twisted.plugin import IPlugin, getPlugins

            list(getPlugins(IPlugin))
        except Exception as e:  # a cache we cannot write is only slower
            print(f"natbypass: could not refresh the twistd plugin cache: {e}")


setup(
    packages=find_packages(include=["natbypass", "natbypass.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/natbypass_plugins.py"]},
    cmdclass={"install": InstallAndRefreshPlugins},
)
