"""The harness core: one run of one method (config and schema, the context a method gets, evaluation, the
run loop, the step-0 evaluation cache, trackers, the Frechet distance against NFE)."""
