{{/*
The environment of the latchkey containers.
*/}}
{{- define "latchkey.env" -}}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- if eq .Values.logFormat "json" }}
- name: LATCHKEY_LOG_FORMAT
  value: json
{{- end }}
{{- if eq .Values.store.type "postgres" }}
# The store URL holds the database password: it comes from a Secret, through the override
# latchkey applies after reading latchkey.toml.
- name: LATCHKEY_STORE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "latchkey.storeSecretName" . }}
      key: {{ include "latchkey.storeSecretKey" . }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Where each file is mounted; latchkey.toml names the same paths (latchkey.paths.*).
*/}}
{{- define "latchkey.volumeMounts" -}}
- name: config
  mountPath: {{ dir (include "latchkey.paths.config" .) }}
  readOnly: true
- name: policies
  mountPath: {{ include "latchkey.paths.policies" . }}
  readOnly: true
- name: sealing
  mountPath: {{ include "latchkey.paths.sealing" . }}
  readOnly: true
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ include "latchkey.paths.tls" . }}
  readOnly: true
{{- end }}
{{- if .Values.backends.github }}
- name: github
  mountPath: {{ include "latchkey.paths.github" . }}
  readOnly: true
{{- end }}
{{- if .Values.backends.vault.enabled }}
- name: vault
  mountPath: {{ include "latchkey.paths.vault" . }}
  readOnly: true
{{- end }}
{{- if include "latchkey.hasCheckpointKey" . }}
- name: checkpoint
  mountPath: {{ include "latchkey.paths.audit" . }}
  readOnly: true
{{- end }}
{{- if eq .Values.store.type "sqlite" }}
- name: data
  mountPath: {{ include "latchkey.paths.data" . }}
{{- end }}
# The root filesystem is read-only; /tmp is the one scratch directory.
- name: tmp
  mountPath: /tmp
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "latchkey.volumes" -}}
- name: config
  secret:
    secretName: {{ include "latchkey.configSecretName" . }}
    defaultMode: 0440
    items:
      - key: latchkey.toml
        path: {{ base (include "latchkey.paths.config" .) }}
- name: policies
  configMap:
    name: {{ include "latchkey.policiesConfigMapName" . }}
- name: sealing
  secret:
    secretName: {{ include "latchkey.sealingSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ include "latchkey.sealingSecretKey" . }}
        path: latchkey.key
      {{- range $file, $value := .Values.sealing.previousKeys }}
      - key: {{ ternary $value $file (not (empty $.Values.sealing.existingSecret)) }}
        path: {{ printf "previous/%s" $file }}
      {{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "latchkey.tlsSecretName" . }}
    defaultMode: 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- if .Values.backends.github }}
# One file per GitHub App, <id>.pem, whichever Secret each key lives in.
- name: github
  projected:
    defaultMode: 0440
    sources:
      {{- range .Values.backends.github }}
      - secret:
          name: {{ default (include "latchkey.githubSecretName" $) .existingSecret }}
          items:
            - key: {{ ternary (default "private-key.pem" .existingSecretKey) (printf "%s.pem" .id) (not (empty .existingSecret)) }}
              path: {{ printf "%s.pem" .id }}
      {{- end }}
{{- end }}
{{- if .Values.backends.vault.enabled }}
- name: vault
  secret:
    secretName: {{ include "latchkey.vaultSecretName" . }}
    defaultMode: 0440
{{- end }}
{{- if include "latchkey.hasCheckpointKey" . }}
- name: checkpoint
  secret:
    secretName: {{ include "latchkey.checkpointSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ include "latchkey.checkpointSecretKey" . }}
        path: checkpoint.key
{{- end }}
{{- if eq .Values.store.type "sqlite" }}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "latchkey.pvcName" . }}
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}
