"""Test helpers: tiny offline random-weight models and processors (`trl_rejection.testing.tiny`), for the test suite
and dry runs. Nothing here is used by the library itself."""
