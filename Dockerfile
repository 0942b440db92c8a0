# image-api: gunicorn serving the Flask app. Two stages: wheels are built with the tools
# they need, and the runtime image gets only the installed packages and the code.
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build
COPY requirements.txt .
RUN python -m venv /opt/venv && /opt/venv/bin/pip install -r requirements.txt

FROM python:3.11.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY image_api ./image_api
COPY wsgi.py gunicorn.conf.py ./

RUN useradd --system --uid 10001 --home-dir /app appuser \
    && mkdir -p /app/data && chown appuser /app/data
USER appuser

# Inside the container gunicorn listens on every interface: compose publishes nginx only,
# never this port (gunicorn must not face the internet: it has no read or send timeouts).
ENV HOST=0.0.0.0 PORT=5000 DATA_DIR=/app/data
EXPOSE 5000
VOLUME ["/app/data"]
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/healthz', timeout=2)"
ENTRYPOINT ["gunicorn", "--config", "gunicorn.conf.py"]
CMD ["wsgi:app"]
