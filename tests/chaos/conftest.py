"""The chaos tests start clusters the way the e2e tests do."""

from tests.e2e.conftest import start_cluster

__all__ = ["start_cluster"]
