"""Fault tests beyond the crash matrix's named points (issue 11, item 8).

* :mod:`faults.harness`: the randomized fault harness. Random operations, each SIGKILLed
  after a random delay drawn from its measured duration, then recovery and the
  invariants. The tiers run it bounded (tests/host/test_faults_random.py,
  tests/lab/test_faults_random_dm.py); ``bench/faults.py`` runs thousands of kills.
* :mod:`faults.scripted`: scripted faults (a lost or damaged registry, an admin's ``rm``,
  a full filesystem, a read-only root, the pool pulled away, dm-flakey and dm-delay).
"""
