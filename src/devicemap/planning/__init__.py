"""Pure planning: a profile, budgets and a workload in, a Plan out; no device, file or clock is touched."""
