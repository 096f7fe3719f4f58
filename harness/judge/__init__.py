"""Judging without measuring: output comparison, the stack-vs-GPU preflight (facts, rules, run-time failures) and
whole stacks judged without their GPU."""
