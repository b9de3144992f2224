"""Serving on a Ray cluster (`pip install 'twotower_ext[ray]'`): N replicas, each with its own model and
scheduler on its own device(s), behind the OpenAI routes of `twotower serve`, requests routed by prompt
prefix. Start it with `twotower serve --ray --replicas N` or a Ray Serve config file whose import_path is
`twotower_ext.serve.ray:build_app` (README: "Scaling out with Ray Serve").

policy, options and exposition need no Ray (the routing policy and the metrics merge are pure functions);
build_app and the deployments import it on first use."""


def __getattr__(name):   # Ray is imported only by what needs it
    if name == "build_app":
        from .app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
