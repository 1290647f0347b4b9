# Lab fixtures (lab_factory, module_lab_factory, orphan-lab reaping) live in the package
# so benchmarks and other test trees can share them.
from hasync.lab.pytest_fixtures import lab_factory, module_lab_factory, reap_orphan_labs  # noqa: F401
