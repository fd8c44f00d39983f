# The Airflow image of docker-compose.yaml: apache/airflow plus the recsys package.
FROM apache/airflow:3.3.2

# Installed editable from /opt/recsys: docker-compose.yaml mounts the working tree over this copy,
# so code changes reach the containers without a rebuild (dependency changes need one).
COPY --chown=airflow:0 . /opt/recsys

# Naming the image's own Airflow version keeps pip from up- or downgrading it while it adds
# recsys's dependencies (https://airflow.apache.org/docs/docker-stack/build.html).
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -e /opt/recsys
