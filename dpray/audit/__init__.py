"""Empirical privacy checks: leak scan of public artifacts, membership/canary audit."""
