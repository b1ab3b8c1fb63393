{{/*
The pod template of one role's Deployment: (dict "root" $ "role" "inference").
Overridable security contexts (restricted by default), gRPC probes on the
standard health service, writable /tmp (and /dev/shm for GPU roles) on a
read-only root filesystem.
*/}}
{{- define "deep3m.podTemplate" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $v := $root.Values }}
{{- $cfg := index $v $role }}
{{- $gpu := eq (include "deep3m.isGpuRole" $role) "true" }}
{{- $usesApi := and (eq $role "scheduler") (eq (include "deep3m.schedulerUsesApi" $root) "true") -}}
metadata:
  labels:
    {{- include "deep3m.componentLabels" . | nindent 4 }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $annotations := merge (deepCopy (default dict $cfg.podAnnotations)) (deepCopy $v.podAnnotations) }}
  {{- if and (eq $role "scheduler") $cfg.blockConsolidation }}
  {{- /* Opt-in: no drain of the node finishes without deleting the pod by hand. */}}
  {{- $_ := set $annotations "karpenter.sh/do-not-disrupt" "true" }}
  {{- $_ := set $annotations "cluster-autoscaler.kubernetes.io/safe-to-evict" "false" }}
  {{- end }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "deep3m.serviceAccountName" . }}
  # Only the scheduler talks to the Kubernetes API, and only when it scales or
  # keeps pod-deletion costs.
  automountServiceAccountToken: {{ $usesApi }}
  {{- with include "deep3m.imagePullSecrets" $root }}{{ . | nindent 2 }}{{ end }}
  {{- with include "deep3m.roleOrGlobal" (dict "root" $root "role" $role "key" "priorityClassName") }}
  priorityClassName: {{ . }}
  {{- end }}
  # The server's own drain (DEEP3M_SHUTDOWN_GRACE_SECONDS) plus a margin.
  terminationGracePeriodSeconds: {{ add (int $cfg.shutdownGraceSeconds) 10 }}
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ $role }}
      image: {{ include "deep3m.image" . | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args: ["serve", {{ $role | quote }}]
      ports:
        - name: grpc
          containerPort: {{ $v.grpcPort }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $v.metricsPort }}
          protocol: TCP
      env:
        {{- include "deep3m.env" . | nindent 8 }}
        {{- if eq $role "scheduler" }}
        - name: DEEP3M_LEASE_SECONDS
          value: {{ $cfg.leaseSeconds | quote }}
        - name: DEEP3M_MAX_ATTEMPTS
          value: {{ $cfg.maxAttempts | quote }}
        {{- include "deep3m.fenceEnv" $cfg.fence | nindent 8 }}
        {{- if $usesApi }}
        {{- include "deep3m.autoscalerEnv" $root | nindent 8 }}
        {{- end }}
        {{- else }}
        - name: DEEP3M_WORKER_CAPACITY
          value: {{ include "deep3m.podCapacity" . | quote }}
        {{- end }}
        {{- if eq $role "inference" }}
        - name: DEEP3M_INFERENCE_PIPELINE_DEPTH
          value: {{ $cfg.pipelineDepth | quote }}
        {{- end }}
        {{- if $gpu }}
        - name: DEEP3M_DEVICE
          value: {{ ternary "cuda" "cpu" (gt (int $cfg.gpu.count) 0) | quote }}
        - name: DEEP3M_BATCH_SIZE
          value: {{ $cfg.batchSize | quote }}
        {{- else }}
        - name: DEEP3M_DEVICE
          value: "cpu"
        {{- end }}
        {{- with $cfg.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      # gRPC health (grpc.health.v1): SERVING only once the role's workers run.
      startupProbe:
        {{- include "deep3m.probeAction" . | nindent 8 }}
        periodSeconds: 5
        timeoutSeconds: 5
        failureThreshold: {{ ternary 60 24 $gpu }}
      readinessProbe:
        {{- include "deep3m.probeAction" . | nindent 8 }}
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 3
      livenessProbe:
        {{- include "deep3m.probeAction" . | nindent 8 }}
        periodSeconds: 20
        timeoutSeconds: 5
        failureThreshold: 3
      resources:
        {{- $resources := deepCopy $cfg.resources }}
        {{- if and $gpu (gt (int $cfg.gpu.count) 0) }}
        {{- $limits := default dict $resources.limits }}
        {{- $_ := set $limits $cfg.gpu.resourceName (int $cfg.gpu.count) }}
        {{- $_ := set $resources "limits" $limits }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      {{- with $v.containerSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- if $gpu }}
        - name: dshm
          mountPath: /dev/shm
        {{- end }}
        {{- include "deep3m.securityVolumeMounts" . | nindent 8 }}
        {{- with $cfg.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: {{ default "1Gi" $cfg.scratchSizeLimit }}
    {{- if $gpu }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $cfg.shmSizeLimit }}
    {{- end }}
    {{- include "deep3m.securityVolumes" . | nindent 4 }}
    {{- with $cfg.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $cfg.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $cfg.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $affinity := deepCopy (default dict $cfg.affinity) }}
  {{- if and (eq $role "scheduler") $cfg.requireOnDemand (not (hasKey $affinity "nodeAffinity")) }}
  {{- $_ := set $affinity "nodeAffinity" (include "deep3m.onDemandAffinity" $root | fromYaml) }}
  {{- end }}
  {{- with $affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $cfg.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- tpl (toYaml .) $root | nindent 4 }}
  {{- end }}
{{- end }}

{{/* Tasks one pod leases at once: workerCapacity, times the GPUs of a GPU pod. (dict "root" $ "role" r) */}}
{{- define "deep3m.podCapacity" -}}
{{- $cfg := index .root.Values .role }}
{{- if and (include "deep3m.isGpuRole" .role) (gt (int $cfg.gpu.count) 1) }}
{{- mul (int $cfg.workerCapacity) (int $cfg.gpu.count) }}
{{- else }}
{{- int $cfg.workerCapacity }}
{{- end }}
{{- end }}

{{/* Leases one pod holds at once: its capacity, times the pipeline depth of an
inference pod (it reads ahead and writes behind the blocks it computes). (dict "root" $ "role" r) */}}
{{- define "deep3m.podLeases" -}}
{{- $capacity := int (include "deep3m.podCapacity" .) }}
{{- if eq .role "inference" }}
{{- mul $capacity (int (index .root.Values .role).pipelineDepth) }}
{{- else }}
{{- $capacity }}
{{- end }}
{{- end }}

{{/* Either label marks on-demand capacity: EKS managed node groups, or Karpenter. */}}
{{- define "deep3m.onDemandAffinity" -}}
requiredDuringSchedulingIgnoredDuringExecution:
  nodeSelectorTerms:
    - matchExpressions:
        - key: eks.amazonaws.com/capacityType
          operator: In
          values: ["ON_DEMAND"]
    - matchExpressions:
        - key: karpenter.sh/capacity-type
          operator: In
          values: ["on-demand"]
{{- end }}

{{/* DEEP3M_AUTOSCALE_* of the scheduler (modes scheduler, and keda with podDeletionCost). */}}
{{- define "deep3m.autoscalerEnv" -}}
{{- $root := . }}
{{- $deployments := list }}
{{- $maxima := list }}
{{- $perReplica := list }}
{{- $capacity := list }}
{{- $gpus := list }}
{{- range $role := list "inference" "training" }}
{{- $cfg := index $root.Values $role }}
{{- if $cfg.enabled }}
{{- $deployments = append $deployments (printf "%s=%s" $role (include "deep3m.component" (dict "root" $root "role" $role))) }}
{{- $maxima = append $maxima (printf "%s=%d" $role (int $cfg.autoscaling.maxReplicas)) }}
{{- $perReplica = append $perReplica (printf "%s=%d" $role (int $cfg.autoscaling.tasksPerReplica)) }}
{{- $leases := ternary (mul (int $cfg.workerCapacity) (int $cfg.pipelineDepth)) (int $cfg.workerCapacity) (eq $role "inference") }}
{{- $capacity = append $capacity (printf "%s=%d" $role $leases) }}
{{- $gpus = append $gpus (printf "%s=%d" $role (int $cfg.gpu.count)) }}
{{- end }}
{{- end -}}
- name: DEEP3M_AUTOSCALE_ENABLED
  value: "true"
- name: DEEP3M_AUTOSCALE_SET_REPLICAS
  value: {{ eq .Values.autoscaling.mode "scheduler" | quote }}
- name: DEEP3M_AUTOSCALE_DELETION_COST
  value: {{ .Values.autoscaling.podDeletionCost | quote }}
- name: DEEP3M_AUTOSCALE_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: DEEP3M_AUTOSCALE_DEPLOYMENTS
  value: {{ join "," $deployments | quote }}
- name: DEEP3M_AUTOSCALE_MAX_REPLICAS_BY_ROLE
  value: {{ join "," $maxima | quote }}
- name: DEEP3M_AUTOSCALE_TASKS_PER_REPLICA_BY_ROLE
  value: {{ join "," $perReplica | quote }}
- name: DEEP3M_AUTOSCALE_WORKER_CAPACITY_BY_ROLE
  value: {{ join "," $capacity | quote }}
- name: DEEP3M_AUTOSCALE_GPUS_PER_POD_BY_ROLE
  value: {{ join "," $gpus | quote }}
- name: DEEP3M_AUTOSCALE_COOLDOWN_SECONDS
  value: {{ .Values.autoscaling.cooldownSeconds | quote }}
- name: DEEP3M_AUTOSCALE_INTERVAL_SECONDS
  value: {{ .Values.autoscaling.pollingIntervalSeconds | quote }}
{{- end }}
