# chatbus in a container: `docker build -t chatbus .`, then `docker compose up` (compose.yaml:
# chatbus and MongoDB). Not built or run by `make test` (no container runtime there).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    CHATBUS_CONFIG=/etc/chatbus/config.toml

WORKDIR /app
COPY pyproject.toml README.md ./
COPY chatbus ./chatbus
COPY core ./core
COPY plugins ./plugins
# The serving dependencies only; add `[litellm]` for provider = "litellm" models.
ARG EXTRAS=""
RUN pip install --no-cache-dir ".${EXTRAS}"

COPY deploy/config.toml /etc/chatbus/config.toml
RUN useradd --system --home /var/lib/chatbus --create-home chatbus
USER chatbus
WORKDIR /var/lib/chatbus
EXPOSE 7861
# Listening beyond loopback needs [auth] keys (chatbus refuses otherwise): see config.toml.
CMD ["chatbus", "serve", "--host", "0.0.0.0"]
