FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY requirements.txt .
RUN pip install -r requirements.txt

COPY image_api ./image_api
COPY wsgi.py gunicorn.conf.py ./

RUN useradd --system --home-dir /app appuser \
    && mkdir -p /app/data && chown appuser /app/data
USER appuser

ENV PORT=5000 DATA_DIR=/app/data
EXPOSE 5000
VOLUME ["/app/data"]
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/healthz', timeout=2)"
CMD ["gunicorn", "--config", "gunicorn.conf.py", "wsgi:app"]
