{{/*
Names and labels.
*/}}
{{- define "latchkey.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "latchkey.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "latchkey.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "latchkey.instanceLabels" -}}
app.kubernetes.io/name: {{ include "latchkey.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The broker's pods. The migration Job's pods carry component=migrate, so that the Service, the
budget and the network policy never select them.
*/}}
{{- define "latchkey.selectorLabels" -}}
{{ include "latchkey.instanceLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "latchkey.labels" -}}
helm.sh/chart: {{ include "latchkey.chart" . }}
{{ include "latchkey.instanceLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "latchkey.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "latchkey.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "latchkey.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The number of replicas: replicaCount, else 2 with PostgreSQL and 1 with SQLite.
*/}}
{{- define "latchkey.replicas" -}}
{{- if kindIs "invalid" .Values.replicaCount }}
{{- ternary 1 2 (eq .Values.store.type "sqlite") }}
{{- else }}
{{- int .Values.replicaCount }}
{{- end }}
{{- end }}

{{/*
Every combination the chart refuses, with the reason. Included by the Deployment, so that any
render of the chart fails on them.
*/}}
{{- define "latchkey.validate" -}}
{{- $store := .Values.store.type }}
{{- if not (has $store (list "sqlite" "postgres")) }}
{{- fail (printf "store.type must be sqlite or postgres, not %q" $store) }}
{{- end }}
{{- if eq $store "sqlite" }}
{{- if gt (int (include "latchkey.replicas" .)) 1 }}
{{- fail (printf "store.type=sqlite runs exactly one replica (the SQLite ledger is one file that one process locks); replicaCount=%s is refused: use store.type=postgres for several replicas" (include "latchkey.replicas" .)) }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- fail "store.type=sqlite runs exactly one replica: autoscaling.enabled=true is refused; use store.type=postgres to autoscale" }}
{{- end }}
{{- end }}
{{- if eq $store "postgres" }}
{{- if and (not .Values.store.postgres.existingSecret) (not .Values.store.postgres.url) }}
{{- fail "store.type=postgres needs store.postgres.existingSecret or store.postgres.url" }}
{{- end }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) (or (not .Values.tls.cert) (not .Values.tls.key)) }}
{{- fail "tls.enabled needs tls.existingSecret, or both tls.cert and tls.key" }}
{{- end }}
{{- range .Values.backends.github }}
{{- if not (regexMatch "^[A-Za-z0-9][A-Za-z0-9_.-]*$" (toString .id)) }}
{{- fail (printf "backends.github: id %q must be letters, digits, '.', '_' or '-' (it names the key file)" (toString .id)) }}
{{- end }}
{{- if and (not .existingSecret) (not .privateKey) }}
{{- fail (printf "backends.github %s: give existingSecret or privateKey" .id) }}
{{- end }}
{{- end }}
{{- with .Values.backends.vault }}
{{- if .enabled }}
{{- if not (has .auth (list "token" "approle")) }}
{{- fail (printf "backends.vault.auth must be token or approle, not %q" .auth) }}
{{- end }}
{{- if not .existingSecret }}
{{- if and (eq .auth "token") (not .token) }}
{{- fail "backends.vault with auth=token needs existingSecret or token" }}
{{- end }}
{{- if and (eq .auth "approle") (not .secretId) }}
{{- fail "backends.vault with auth=approle needs existingSecret or secretId" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Where the pod finds its files. latchkey.toml names them by these absolute paths.
*/}}
{{- define "latchkey.paths.config" -}}/etc/latchkey/config/latchkey.toml{{- end }}
{{- define "latchkey.paths.policies" -}}/etc/latchkey/policies{{- end }}
{{- define "latchkey.paths.sealing" -}}/etc/latchkey/sealing{{- end }}
{{- define "latchkey.paths.tls" -}}/etc/latchkey/tls{{- end }}
{{- define "latchkey.paths.github" -}}/etc/latchkey/github{{- end }}
{{- define "latchkey.paths.vault" -}}/etc/latchkey/vault{{- end }}
{{- define "latchkey.paths.audit" -}}/etc/latchkey/audit{{- end }}
{{- define "latchkey.paths.data" -}}/var/lib/latchkey{{- end }}

{{/*
Secret and ConfigMap names.
*/}}
{{- define "latchkey.configSecretName" -}}
{{- default (printf "%s-config" (include "latchkey.fullname" .)) .Values.config.existingSecret }}
{{- end }}

{{- define "latchkey.policiesConfigMapName" -}}
{{- default (printf "%s-policies" (include "latchkey.fullname" .)) .Values.existingPoliciesConfigMap }}
{{- end }}

{{- define "latchkey.sealingSecretName" -}}
{{- default (printf "%s-sealing" (include "latchkey.fullname" .)) .Values.sealing.existingSecret }}
{{- end }}

{{- define "latchkey.sealingSecretKey" -}}
{{- ternary .Values.sealing.existingSecretKey "latchkey.key" (not (empty .Values.sealing.existingSecret)) }}
{{- end }}

{{- define "latchkey.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "latchkey.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{- define "latchkey.vaultSecretName" -}}
{{- default (printf "%s-vault" (include "latchkey.fullname" .)) .Values.backends.vault.existingSecret }}
{{- end }}

{{- define "latchkey.githubSecretName" -}}
{{- printf "%s-github" (include "latchkey.fullname" .) }}
{{- end }}

{{- define "latchkey.checkpointSecretName" -}}
{{- default (printf "%s-checkpoint" (include "latchkey.fullname" .)) .Values.config.audit.checkpointKey.existingSecret }}
{{- end }}

{{- define "latchkey.checkpointSecretKey" -}}
{{- ternary .Values.config.audit.checkpointKey.existingSecretKey "checkpoint.key" (not (empty .Values.config.audit.checkpointKey.existingSecret)) }}
{{- end }}

{{- define "latchkey.hasCheckpointKey" -}}
{{- if or .Values.config.audit.checkpointKey.existingSecret .Values.config.audit.checkpointKey.key }}true{{- end }}
{{- end }}

{{- define "latchkey.storeSecretName" -}}
{{- default (printf "%s-store" (include "latchkey.fullname" .)) .Values.store.postgres.existingSecret }}
{{- end }}

{{- define "latchkey.storeSecretKey" -}}
{{- ternary .Values.store.postgres.existingSecretKey "url" (not (empty .Values.store.postgres.existingSecret)) }}
{{- end }}

{{- define "latchkey.pvcName" -}}
{{- default (printf "%s-data" (include "latchkey.fullname" .)) .Values.store.sqlite.persistence.existingClaim }}
{{- end }}

{{/*
A TOML string: JSON's string escapes are a subset of TOML's basic-string escapes.
*/}}
{{- define "latchkey.tomlString" -}}
{{- toJson (toString .) }}
{{- end }}

{{/*
latchkey.toml. Every key here is a field of src/config.rs (whose tables deny unknown keys);
paths are where the pod mounts each file. [[issuer]] and [admin_oidc] are passed through as the
values give them, in latchkey.toml's own key names.
*/}}
{{- define "latchkey.config" -}}
{{- $c := .Values.config -}}
# latchkey.toml, rendered by the latchkey Helm chart ({{ include "latchkey.chart" . }}).
[server]
listen = {{ include "latchkey.tomlString" (printf "0.0.0.0:%d" (int .Values.ports.api)) }}
admin_listen = {{ include "latchkey.tomlString" (printf "0.0.0.0:%d" (int .Values.ports.metrics)) }}
audience = {{ include "latchkey.tomlString" $c.server.audience }}
{{- with $c.server.publicUrl }}
public_url = {{ include "latchkey.tomlString" . }}
{{- end }}
header_read_timeout = {{ include "latchkey.tomlString" $c.server.headerReadTimeout }}
{{- if .Values.tls.enabled }}
tls_cert_file = {{ include "latchkey.tomlString" (printf "%s/tls.crt" (include "latchkey.paths.tls" .)) }}
tls_key_file = {{ include "latchkey.tomlString" (printf "%s/tls.key" (include "latchkey.paths.tls" .)) }}
{{- end }}

{{ if eq .Values.store.type "sqlite" -}}
[store]
url = {{ include "latchkey.tomlString" (printf "sqlite://%s/%s" (include "latchkey.paths.data" .) .Values.store.sqlite.file) }}
{{- else -}}
# [store] url comes from the environment: LATCHKEY_STORE_URL, from Secret {{ include "latchkey.storeSecretName" . }}.
{{- end }}

[sealing]
key_file = {{ include "latchkey.tomlString" (printf "%s/latchkey.key" (include "latchkey.paths.sealing" .)) }}
previous_key_files = [
{{- range $i, $name := keys .Values.sealing.previousKeys | sortAlpha }}
{{- if $i }}, {{ end }}{{ include "latchkey.tomlString" (printf "%s/previous/%s" (include "latchkey.paths.sealing" $) $name) }}
{{- end -}}
]

[policies]
dir = {{ include "latchkey.tomlString" (include "latchkey.paths.policies" .) }}
reload_interval = {{ include "latchkey.tomlString" $c.policies.reloadInterval }}

[audit]
{{- with $c.audit.stream }}
stream = {{ include "latchkey.tomlString" . }}
{{- end }}
checkpoint_interval = {{ include "latchkey.tomlString" $c.audit.checkpointInterval }}
{{- if include "latchkey.hasCheckpointKey" . }}
checkpoint_key_file = {{ include "latchkey.tomlString" (printf "%s/checkpoint.key" (include "latchkey.paths.audit" .)) }}
{{- end }}

[limits]
job_concurrency = {{ int $c.limits.jobConcurrency }}
outbound_timeout = {{ include "latchkey.tomlString" $c.limits.outboundTimeout }}

[backends.jwt]
enabled = {{ .Values.backends.jwt.enabled }}
{{- range .Values.backends.github }}

[[backends.github]]
id = {{ include "latchkey.tomlString" .id }}
app_id = {{ int64 .appId }}
private_key_file = {{ include "latchkey.tomlString" (printf "%s/%s.pem" (include "latchkey.paths.github" $) .id) }}
{{- with .apiUrl }}
api_url = {{ include "latchkey.tomlString" . }}
{{- end }}
{{- end }}
{{- with .Values.backends.aws }}
{{- if .enabled }}

[backends.aws]
region = {{ include "latchkey.tomlString" .region }}
{{- with .endpointUrl }}
endpoint_url = {{ include "latchkey.tomlString" . }}
{{- end }}
{{- with .rolePath }}
role_path = {{ include "latchkey.tomlString" . }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.backends.vault }}
{{- if .enabled }}

[backends.vault]
address = {{ include "latchkey.tomlString" .address }}
token_role = {{ include "latchkey.tomlString" .tokenRole }}
{{- with .namespace }}
namespace = {{ include "latchkey.tomlString" . }}
{{- end }}
{{- if or .caCert (and .existingSecret .existingSecretHasCa) }}
ca_file = {{ include "latchkey.tomlString" (printf "%s/ca.crt" (include "latchkey.paths.vault" $)) }}
{{- end }}
{{- if eq .auth "token" }}
token_file = {{ include "latchkey.tomlString" (printf "%s/token" (include "latchkey.paths.vault" $)) }}
{{- else }}

[backends.vault.approle]
role_id = {{ include "latchkey.tomlString" .approle.roleId }}
secret_id_file = {{ include "latchkey.tomlString" (printf "%s/secret-id" (include "latchkey.paths.vault" $)) }}
mount = {{ include "latchkey.tomlString" .approle.mount }}
{{- end }}
{{- end }}
{{- end }}
{{- range $c.adminKeys }}

[[admin_key]]
name = {{ include "latchkey.tomlString" .name }}
role = {{ include "latchkey.tomlString" .role }}
sha256 = {{ include "latchkey.tomlString" .sha256 }}
{{- end }}
{{- with $c.adminOidc }}

{{ toToml (dict "admin_oidc" .) }}
{{- end }}
{{- with $c.issuers }}

{{ toToml (dict "issuer" .) }}
{{- end }}
{{- end }}
