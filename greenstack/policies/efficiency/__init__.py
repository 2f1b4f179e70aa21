"""Efficiency policies (the `efficiency` config group): each probes, then keeps itself only where it helps.

`efficiency=default` enables the stack (conf/efficiency/default.yaml); `efficiency.<name>.enabled=false`
or `~efficiency.<name>` removes one policy. The mechanics are plain functions in greenstack.efficiency.
"""
