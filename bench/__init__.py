# Before torch: importing the package first sets the OpenMP wait policy the product runs with (passive; see
# python/twotower_ext/__init__.py), which takes effect only while torch is not loaded yet. Timed under libgomp's
# default spinning instead, the CPU ops' helper threads found the other core taken by a spinning OpenMP thread and
# picked an op up ~1 ms late: 2 threads were no faster than 1.
import twotower_ext  # noqa: F401
