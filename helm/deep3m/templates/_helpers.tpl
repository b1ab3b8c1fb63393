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

{{/* One ServiceAccount per role: (dict "root" $ "role" "scheduler"). */}}
{{- define "deep3m.serviceAccountName" -}}
{{- $v := .root.Values }}
{{- if $v.serviceAccount.create }}
{{- printf "%s-%s" (default (include "deep3m.fullname" .root) $v.serviceAccount.name) .role | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- default "default" $v.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Roles that get a ServiceAccount: the scheduler and every enabled worker role. */}}
{{- define "deep3m.accountRoles" -}}
{{- $roles := list "scheduler" }}
{{- range $role := list "tiling" "postprocess" "training" "inference" }}
{{- if (index $.Values $role).enabled }}{{ $roles = append $roles $role }}{{ end }}
{{- end }}
{{- join "," $roles }}
{{- end }}

{{/* The scheduler talks to the Kubernetes API: it scales (mode scheduler) or keeps pod-deletion costs. */}}
{{- define "deep3m.schedulerUsesApi" -}}
{{- $mode := .Values.autoscaling.mode }}
{{- $gpu := or .Values.training.enabled .Values.inference.enabled }}
{{- if and $gpu (or (eq $mode "scheduler") (and (eq $mode "keda") .Values.autoscaling.podDeletionCost)) }}true{{ end }}
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

{{- define "deep3m.registry" -}}
{{- $registry := coalesce (dig "imageRegistry" "" (default dict .Values.global)) .Values.image.registry }}
{{- if not $registry }}
{{- fail "image.registry (or global.imageRegistry) is required: the registry that holds the deep3m and deep3m-cuda images, e.g. 111122223333.dkr.ecr.us-east-1.amazonaws.com (build and push them with `make images REGISTRY=...`)" }}
{{- end }}
{{- trimSuffix "/" $registry }}
{{- end }}

{{/* registry/repository:tag[@digest]: (dict "root" $ "role" "inference") */}}
{{- define "deep3m.image" -}}
{{- $flavor := ternary .root.Values.image.cuda .root.Values.image.cpu (eq (include "deep3m.isGpuRole" .role) "true") }}
{{- $tag := default .root.Chart.AppVersion $flavor.tag }}
{{- $ref := printf "%s/%s:%s" (include "deep3m.registry" .root) $flavor.repository $tag }}
{{- if $flavor.digest }}
{{- $ref = printf "%s@%s" $ref $flavor.digest }}
{{- end }}
{{- $ref }}
{{- end }}

{{- define "deep3m.imagePullSecrets" -}}
{{- $secrets := concat (dig "imagePullSecrets" list (default dict .Values.global)) .Values.imagePullSecrets | uniq }}
{{- with $secrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The role's own value, else the chart-wide one: (dict "root" $ "role" r "key" "priorityClassName") */}}
{{- define "deep3m.roleOrGlobal" -}}
{{- default (index .root.Values .key) (index (index .root.Values .role) .key) }}
{{- end }}

{{- define "deep3m.schedulerAddress" -}}
{{- printf "%s:%d" (include "deep3m.component" (dict "root" . "role" "scheduler")) (int .Values.grpcPort) }}
{{- end }}

{{/* Security ------------------------------------------------------------------------- */}}

{{/* Where pods find the tokens and the certificate (Secret volumes). */}}
{{- define "deep3m.authDir" -}}/etc/deep3m/auth{{- end }}
{{- define "deep3m.tlsDir" -}}/etc/deep3m/tls{{- end }}

{{- define "deep3m.authSecret" -}}
{{- required "auth.existingSecret is required with auth.enabled: a Secret with the keys client and worker-<role> for every enabled worker role (docs/SECURITY.md)" .Values.auth.existingSecret }}
{{- end }}

{{/* The certificate's Secret: the one cert-manager writes, else tls.existingSecret. */}}
{{- define "deep3m.tlsSecret" -}}
{{- if .Values.tls.certManager.enabled }}
{{- printf "%s-tls" (include "deep3m.fullname" .) }}
{{- else }}
{{- required "tls.existingSecret is required with tls.enabled: a Secret with tls.crt, tls.key and ca.crt (or set tls.certManager.enabled)" .Values.tls.existingSecret }}
{{- end }}
{{- end }}

{{/* The pod mounts tokens: every role with auth on (the helm test pod presents none). (dict "root" $ "role" r) */}}
{{- define "deep3m.mountsTokens" -}}
{{- if and .root.Values.auth.enabled (ne .role "test") }}true{{ end }}
{{- end }}

{{/* DEEP3M_AUTH_* and DEEP3M_TLS_* of a pod. (dict "root" $ "role" r) */}}
{{- define "deep3m.securityEnv" -}}
{{- $v := .root.Values }}
{{- if include "deep3m.mountsTokens" . }}
- name: DEEP3M_AUTH_ENABLED
  value: "true"
- name: DEEP3M_AUTH_TOKEN_DIR
  value: {{ include "deep3m.authDir" . | quote }}
{{- if has .role (list "tiling" "postprocess" "training" "inference") }}
- name: DEEP3M_AUTH_TOKEN_FILE
  value: {{ printf "%s/worker-%s" (include "deep3m.authDir" .) .role | quote }}
{{- end }}
{{- end }}
{{- if $v.tls.enabled }}
- name: DEEP3M_TLS_ENABLED
  value: "true"
- name: DEEP3M_TLS_CERT_FILE
  value: {{ printf "%s/tls.crt" (include "deep3m.tlsDir" .) | quote }}
- name: DEEP3M_TLS_KEY_FILE
  value: {{ printf "%s/tls.key" (include "deep3m.tlsDir" .) | quote }}
- name: DEEP3M_TLS_CA_FILE
  value: {{ printf "%s/ca.crt" (include "deep3m.tlsDir" .) | quote }}
- name: DEEP3M_TLS_CLIENT_AUTH
  value: {{ $v.tls.clientAuth | quote }}
{{- end }}
{{- end }}

{{/* Mounts of the token and certificate Secrets. (dict "root" $ "role" r) */}}
{{- define "deep3m.securityVolumeMounts" -}}
{{- if include "deep3m.mountsTokens" . }}
- name: auth-tokens
  mountPath: {{ include "deep3m.authDir" . }}
  readOnly: true
{{- end }}
{{- if .root.Values.tls.enabled }}
- name: tls
  mountPath: {{ include "deep3m.tlsDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* A whole-Secret mount (no subPath), so a rotated Secret reaches the pod. Mode 0440:
the pod's user reads it through its fsGroup. (dict "root" $ "role" r) */}}
{{- define "deep3m.securityVolumes" -}}
{{- if include "deep3m.mountsTokens" . }}
- name: auth-tokens
  secret:
    secretName: {{ include "deep3m.authSecret" .root }}
    defaultMode: 288
{{- end }}
{{- if .root.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "deep3m.tlsSecret" .root }}
    defaultMode: 288
{{- end }}
{{- end }}

{{/* One probe: gRPC health over plaintext; with TLS the image's own health check
(exec), which speaks TLS with the pod's certificate. (dict "root" $ "role" r) */}}
{{- define "deep3m.probeAction" -}}
{{- if .root.Values.tls.enabled }}
exec:
  command:
    - python
    - -m
    - deep3m.runtime.healthcheck
    - --server-name
    - {{ include "deep3m.component" . }}
{{- else }}
grpc:
  port: {{ .root.Values.grpcPort }}
{{- end }}
{{- end }}

{{/* Environment ---------------------------------------------------------------------- */}}

{{/* Settings every role reads (deep3m.runtime.settings.Settings). (dict "root" $ "role" r) */}}
{{- define "deep3m.env" -}}
{{- $v := .root.Values -}}
- name: DEEP3M_STORE_URL
  value: {{ required "store.url is required: the S3 store root every role reads and writes, s3://bucket/prefix (see k8s/README.md, step 2)" $v.store.url | quote }}
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
  value: {{ $v.bindAddress | quote }}
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
{{- with (default dict (index $v .role)).shutdownGraceSeconds }}
- name: DEEP3M_SHUTDOWN_GRACE_SECONDS
  value: {{ . | quote }}
{{- end }}
- name: DEEP3M_WORKER_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- include "deep3m.securityEnv" . }}
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

{{- define "deep3m.metricsFrom" -}}
{{- $np := .Values.networkPolicy }}
{{- $peers := list }}
{{- range $ns := list $np.kedaNamespace $np.prometheusNamespace }}
{{- if $ns }}
{{- $peers = append $peers (dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" $ns))) }}
{{- end }}
{{- end }}
{{- toYaml (concat $peers $np.extraMetricsFrom) }}
{{- end }}

{{- define "deep3m.metricsIngress" -}}
{{- $peers := include "deep3m.metricsFrom" . | fromYamlArray }}
{{- with $peers -}}
- from:
    {{- toYaml . | nindent 4 }}
  ports:
    - port: metrics
      protocol: TCP
{{- end }}
{{- end }}

{{/* DEEP3M_FENCE_* of the scheduler (scheduler.fence); renewals must come well within the TTL. */}}
{{- define "deep3m.fenceEnv" -}}
{{- if ge (float64 .renewSeconds) (mulf (float64 .ttlSeconds) 0.75) }}
{{- fail (printf "scheduler.fence.renewSeconds (%v) must be below three quarters of scheduler.fence.ttlSeconds (%v): the scheduler stops writing a quarter TTL before its fence expires" .renewSeconds .ttlSeconds) }}
{{- end -}}
- name: DEEP3M_FENCE_TTL_SECONDS
  value: {{ .ttlSeconds | quote }}
- name: DEEP3M_FENCE_RENEW_SECONDS
  value: {{ .renewSeconds | quote }}
- name: DEEP3M_FENCE_WAIT_SECONDS
  value: {{ .waitSeconds | quote }}
{{- end }}
