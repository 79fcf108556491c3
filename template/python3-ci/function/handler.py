from faasci.api import endpoint


@endpoint
def handle(event, context):
    """Return a dict: it becomes a JSON response with status 200."""
    return {"message": "hello from faas-ci", "method": event.method, "path": event.path}
