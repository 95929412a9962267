"""The API's routers: one ``APIRouter(prefix, tags)`` per resource."""
