import sys

from image_api import create_app
from image_api.config import ConfigError

try:
    app = create_app()
except ConfigError as error:
    # What only building the app finds (a SECRET_KEY file too short...): one line, and
    # status 3, gunicorn's "worker failed to boot", so its master stops instead of
    # starting the worker again and again.
    print(f"image-api: {error.message}", file=sys.stderr, flush=True)
    sys.exit(3)
