# The Airflow image of docker-compose.yaml: apache/airflow plus the recsys package.
# Python 3.11 to match constraints.txt, so the image gets exactly the versions the tests ran with.
FROM apache/airflow:3.3.2-python3.11

# Installed editable from /opt/recsys: docker-compose.yaml mounts the working tree over this copy,
# so code changes reach the containers without a rebuild (dependency changes need one).
COPY --chown=airflow:0 . /opt/recsys

# requirements.txt pins the image's own Airflow (3.3.2), so pip neither up- nor downgrades it.
RUN pip install --no-cache-dir -r /opt/recsys/requirements.txt -e /opt/recsys
