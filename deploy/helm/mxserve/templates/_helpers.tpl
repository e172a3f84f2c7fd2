{{- define "mxserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mxserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "mxserve.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "mxserve.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mxserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mxserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mxserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "mxserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "mxserve.servedModelName" -}}
{{- default .Values.model.name .Values.model.servedModelName -}}
{{- end -}}

{{- define "mxserve.pvcName" -}}
{{- default (printf "%s-model-cache" (include "mxserve.fullname" .)) .Values.modelCache.existingClaim -}}
{{- end -}}

{{/* Host memory limit in GiB: pinned offloaded experts and memory-backed /dev/shm are charged to the pod. */}}
{{- define "mxserve.memoryGiB" -}}
{{- if gt (int .Values.resources.memoryLimitGiB) 0 -}}
{{- int .Values.resources.memoryLimitGiB -}}
{{- else -}}
{{- $m := int .Values.resources.memoryBaseGiB -}}
{{- if .Values.offload.enabled }}{{ $m = add $m (int .Values.offload.hostMemoryGiB) }}{{ end -}}
{{- if .Values.shm.enabled }}{{ $m = add $m (int .Values.shm.sizeGiB) }}{{ end -}}
{{- $m -}}
{{- end -}}
{{- end -}}

{{- define "mxserve.validate" -}}
{{- $tp := int .Values.engineArgs.tensorParallelSize -}}
{{- $pp := int .Values.engineArgs.pipelineParallelSize -}}
{{- if and (not .Values.multiNode.enabled) (lt (int .Values.resources.gpu) (mul $tp $pp)) -}}
{{- fail (printf "resources.gpu=%d is less than tensorParallelSize x pipelineParallelSize = %d" (int .Values.resources.gpu) (mul $tp $pp)) -}}
{{- end -}}
{{- if and .Values.multiNode.enabled (lt (int .Values.multiNode.size) 2) -}}
{{- fail "multiNode.size must be >= 2 (leader + at least one worker)" -}}
{{- end -}}
{{- if and .Values.offload.enabled (le (int .Values.offload.hostMemoryGiB) 0) -}}
{{- fail "offload.enabled requires offload.hostMemoryGiB > 0 (pinned experts count against the memory limit)" -}}
{{- end -}}
{{- if and .Values.multiNode.enabled (ne .Values.autoscaling.mode "none") -}}
{{- fail "autoscaling is not supported with multiNode (scale LeaderWorkerSet replicas instead)" -}}
{{- end -}}
{{- end -}}

{{/* `vllm serve` arguments (after the model). */}}
{{- define "mxserve.vllmArgs" -}}
- {{ .Values.model.name | quote }}
- "--host"
- "0.0.0.0"
- "--port"
- {{ .Values.containerPort | quote }}
- "--served-model-name"
- {{ include "mxserve.servedModelName" . | quote }}
- "--quantization"
- {{ .Values.quantization.method | quote }}
- "--kv-cache-dtype"
- {{ .Values.kvCache.dtype | quote }}
- "--tensor-parallel-size"
- {{ .Values.engineArgs.tensorParallelSize | quote }}
- "--pipeline-parallel-size"
- {{ .Values.engineArgs.pipelineParallelSize | quote }}
- "--max-model-len"
- {{ .Values.engineArgs.maxModelLen | quote }}
- "--gpu-memory-utilization"
- {{ .Values.engineArgs.gpuMemoryUtilization | quote }}
- "--max-num-seqs"
- {{ .Values.engineArgs.maxNumSeqs | quote }}
{{- if .Values.model.revision }}
- "--revision"
- {{ .Values.model.revision | quote }}
{{- end }}
{{- if .Values.engineArgs.enablePrefixCaching }}
- "--enable-prefix-caching"
{{- else }}
- "--no-enable-prefix-caching"
{{- end }}
{{- if .Values.engineArgs.enforceEager }}
- "--enforce-eager"
{{- end }}
{{- if .Values.multiNode.enabled }}
- "--distributed-executor-backend"
- "ray"
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "mxserve.env" -}}
- name: HF_HOME
  value: {{ printf "%s/hf" .Values.modelCache.mountPath | quote }}
- name: VLLM_CACHE_ROOT
  value: {{ printf "%s/vllm-cache" .Values.modelCache.mountPath | quote }}
- name: HOME
  value: /tmp/home
- name: VLLM_NO_USAGE_STATS
  value: "1"
{{- if .Values.hfToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.hfToken.existingSecret }}
      key: {{ .Values.hfToken.key }}
{{- end }}
{{- if .Values.apiKey.existingSecret }}
- name: VLLM_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiKey.existingSecret }}
      key: {{ .Values.apiKey.key }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "mxserve.resources" -}}
requests:
  cpu: {{ .Values.resources.cpuRequest | quote }}
  memory: {{ printf "%sGi" (include "mxserve.memoryGiB" .) | quote }}
  {{ .Values.resources.gpuResource }}: {{ .Values.resources.gpu | quote }}
limits:
  {{- if .Values.resources.cpuLimit }}
  cpu: {{ .Values.resources.cpuLimit | quote }}
  {{- end }}
  memory: {{ printf "%sGi" (include "mxserve.memoryGiB" .) | quote }}
  {{ .Values.resources.gpuResource }}: {{ .Values.resources.gpu | quote }}
{{- end -}}

{{- define "mxserve.volumeMounts" -}}
- name: model-cache
  mountPath: {{ .Values.modelCache.mountPath }}
- name: tmp
  mountPath: /tmp
{{- if .Values.shm.enabled }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- end -}}

{{- define "mxserve.volumes" -}}
- name: model-cache
{{- if .Values.modelCache.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "mxserve.pvcName" . }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir: {}
{{- if .Values.shm.enabled }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ printf "%dGi" (int .Values.shm.sizeGiB) }}
{{- end }}
{{- end -}}

{{- define "mxserve.probes" -}}
startupProbe:
  httpGet:
    path: /health
    port: http
  initialDelaySeconds: {{ .Values.startupProbe.initialDelaySeconds }}
  periodSeconds: {{ .Values.startupProbe.periodSeconds }}
  failureThreshold: {{ .Values.startupProbe.failureThreshold }}
  timeoutSeconds: {{ .Values.startupProbe.timeoutSeconds }}
readinessProbe:
  httpGet:
    path: /health
    port: http
  periodSeconds: {{ .Values.readinessProbe.periodSeconds }}
  failureThreshold: {{ .Values.readinessProbe.failureThreshold }}
  timeoutSeconds: {{ .Values.readinessProbe.timeoutSeconds }}
livenessProbe:
  httpGet:
    path: /health
    port: http
  periodSeconds: {{ .Values.livenessProbe.periodSeconds }}
  failureThreshold: {{ .Values.livenessProbe.failureThreshold }}
  timeoutSeconds: {{ .Values.livenessProbe.timeoutSeconds }}
{{- end -}}

{{/* Pod-level fields shared by the Deployment and the LeaderWorkerSet templates. */}}
{{- define "mxserve.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
{{- with .Values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  {{- include "mxserve.volumes" . | nindent 2 }}
{{- end -}}
