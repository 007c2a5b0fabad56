# Stores encrypt by default and take their master key from KUMA_MASTER_KEY unless given
# one: tests (and the child VMs they start, which inherit the environment) use this one.
System.put_env("KUMA_MASTER_KEY", String.duplicate("6b", 32))
ExUnit.start(capture_log: true)
