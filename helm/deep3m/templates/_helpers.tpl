{{/* Names ---------------------------------------------------------------------------- */}}

{{- define "deep3m.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "deep3m.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The name of one role's objects: (dict "root" $ "role" "inference") */}}
{{- define "deep3m.component" -}}
{{- printf "%s-%s" (include "deep3m.fullname" .root) .role }}
{{- end }}

{{- define "deep3m.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "deep3m.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "deep3m.credentialsSecret" -}}
{{- if .Values.store.credentials.existingSecret }}
{{- .Values.store.credentials.existingSecret }}
{{- else if .Values.store.credentials.accessKeyId }}
{{- printf "%s-store" (include "deep3m.fullname" .) }}
{{- end }}
{{- end }}

{{/* Labels ---------------------------------------------------------------------------- */}}

{{- define "deep3m.selectorLabels" -}}
app.kubernetes.io/name: {{ include "deep3m.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "deep3m.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "deep3m.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: deep3m
{{- end }}

{{/* (dict "root" $ "role" "inference") */}}
{{- define "deep3m.componentSelectorLabels" -}}
{{ include "deep3m.selectorLabels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{- define "deep3m.componentLabels" -}}
{{ include "deep3m.labels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{/* Roles ----------------------------------------------------------------------------- */}}

{{- define "deep3m.isGpuRole" -}}
{{- if has . (list "training" "inference") }}true{{ end }}
{{- end }}

{{/* True when the worker count of a role is managed by KEDA or the scheduler. */}}
{{- define "deep3m.isAutoscaled" -}}
{{- if and (include "deep3m.isGpuRole" .role) (ne .root.Values.autoscaling.mode "fixed") }}true{{ end }}
{{- end }}

{{- define "deep3m.image" -}}
{{- $flavor := ternary .root.Values.image.cuda .root.Values.image.cpu (eq (include "deep3m.isGpuRole" .role) "true") }}
{{- $tag := default .root.Chart.AppVersion $flavor.tag }}
{{- if .root.Values.image.registry }}
{{- printf "%s/%s:%s" (trimSuffix "/" .root.Values.image.registry) $flavor.repository $tag }}
{{- else }}
{{- printf "%s:%s" $flavor.repository $tag }}
{{- end }}
{{- end }}

{{- define "deep3m.schedulerAddress" -}}
{{- printf "%s:%d" (include "deep3m.component" (dict "root" . "role" "scheduler")) (int .Values.grpcPort) }}
{{- end }}

{{/* Security ------------------------------------------------------------------------- */}}

{{/* Pod Security Standards "restricted": the image runs as UID 10001. */}}
{{- define "deep3m.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "deep3m.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Environment ---------------------------------------------------------------------- */}}

{{/* Settings every role reads (deep3m.runtime.settings.Settings). (dict "root" $ "role" r) */}}
{{- define "deep3m.env" -}}
{{- $v := .root.Values -}}
- name: DEEP3M_STORE_URL
  value: {{ required "store.url is required (s3://bucket/prefix)" $v.store.url | quote }}
- name: DEEP3M_S3_REGION
  value: {{ $v.store.region | quote }}
- name: DEEP3M_S3_ENDPOINT_URL
  value: {{ $v.store.endpointUrl | quote }}
- name: DEEP3M_INPUT_ROOTS
  value: {{ $v.store.inputRoots | quote }}
- name: DEEP3M_RESTRICT_LOCAL_INPUTS
  value: {{ $v.store.restrictLocalInputs | quote }}
{{- with include "deep3m.credentialsSecret" .root }}
- name: DEEP3M_S3_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $v.store.credentials.accessKeyIdKey }}
- name: DEEP3M_S3_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $v.store.credentials.secretAccessKeyKey }}
{{- end }}
- name: DEEP3M_HOST
  value: "0.0.0.0"
- name: DEEP3M_GRPC_PORT
  value: {{ $v.grpcPort | quote }}
- name: DEEP3M_METRICS_PORT
  value: {{ $v.metricsPort | quote }}
- name: DEEP3M_SCHEDULER_ADDRESS
  value: {{ include "deep3m.schedulerAddress" .root | quote }}
- name: DEEP3M_LOG_LEVEL
  value: {{ $v.logLevel | quote }}
- name: DEEP3M_LOG_FORMAT
  value: "json"
- name: DEEP3M_SHUTDOWN_GRACE_SECONDS
  value: {{ $v.shutdownGraceSeconds | quote }}
- name: DEEP3M_WORKER_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}

{{/* NetworkPolicy ingress rules ------------------------------------------------------ */}}
{{- define "deep3m.grpcIngress" -}}
- from:
    - podSelector:
        matchLabels:
          {{- include "deep3m.selectorLabels" . | nindent 10 }}
    - podSelector:
        matchLabels:
          deep3m.io/client: "true"
    {{- with .Values.networkPolicy.extraClients }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - port: grpc
      protocol: TCP
{{- end }}

{{- define "deep3m.metricsIngress" -}}
{{- with .Values.networkPolicy.metricsFrom -}}
- from:
    {{- toYaml . | nindent 4 }}
  ports:
    - port: metrics
      protocol: TCP
{{- end }}
{{- end }}
