"""Host-side machinery behind `jaxgen.Generator`: option checks, batching and bucketing, one
generation job's layout and results, the slot scheduler, streaming, devices and replicas, memory
estimates and the compilation cache. The device-side pure functions live in `jaxgen.model` and
`jaxgen.decoding`; the public faces are `jaxgen.Generator` and `jaxgen.functional`."""
